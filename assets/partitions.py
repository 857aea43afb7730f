"""Partitions shared by the stages: chemical systems and surrogates appear at run time."""

import dagster as dg

#: A chemical system as its elements sorted and joined by '-', e.g. ``Ba-O-Ru``.
chemical_system_partitions = dg.DynamicPartitionsDefinition(name="chemical_system")
#: A surrogate's registry name, e.g. ``M3GNet-MP-2021.2.8-PES`` or ``CHGNet-0.3.0``.
surrogate_partitions = dg.DynamicPartitionsDefinition(name="surrogate")
#: Screening runs per chemical system x surrogate.
screening_partitions = dg.MultiPartitionsDefinition(
    {"chemical_system": chemical_system_partitions, "surrogate": surrogate_partitions}
)

DEFAULT_CHEMICAL_SYSTEM = "Ba-O-Ru"
