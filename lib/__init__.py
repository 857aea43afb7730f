"""CGWGAN domain library.

Pure, typed, columnar functions for every stage of the platform. Nothing in ``lib`` imports
Dagster or reads the environment: settings come in as keyword arguments, paths as arguments.

Stages, by module:

- ``lib.mp_sources``     MP structures from a file, a folder, the MP API or the embedded default
- ``lib.wyckoff``        Wyckoff-position tables (pyxtal), projection and orbit expansion
- ``lib.symmetry``       symmetry analysis and the asymmetric unit of each structure
- ``lib.encoding``       the versioned vector encoding of crystal templates
- ``lib.gan``            the Wasserstein GAN with gradient penalty (generator + critic)
- ``lib.templates``      decoding, filters and quality metrics of generated templates
- ``lib.infill``         atom infill of templates with a chemical system
- ``lib.dedup``          within-system dedup and matching against MP
- ``lib.surrogates``     surrogate registry and batched energies/forces/stresses
- ``lib.screening``      pre-screen, relaxation, hull, phonons, shortlist
- ``lib.dft``            VASP/phonopy hand-off and ingest
- ``lib.store``          atomic Parquet tables and the DuckDB catalog
"""

__version__ = "0.1.0"
