"""CGWGAN domain library.

Pure, typed, columnar functions for every stage of the platform. Nothing in ``lib`` imports
Dagster or reads the environment: settings come in as keyword arguments, paths as arguments.

Stages, by module:

- ``lib.mp_sources``     MP structures from a file, a folder, the MP API or the embedded default
- ``lib.known_phases``   the Ba-Ru-O known phases shipped in ``lib/data`` (textbook structure types)
- ``lib.wyckoff``        Wyckoff-position tables (pyxtal), projection and orbit expansion
- ``lib.cells``          cell / Structure / ASU conversions and shared cell helpers
- ``lib.symmetry``       symmetry analysis and the asymmetric unit of each structure
- ``lib.training``       the GAN's training table (filters, hold-outs, encoding)
- ``lib.encoding``       the versioned vector encoding of crystal templates
- ``lib.gan``            the Wasserstein GAN with gradient penalty (generator + critic)
- ``lib.templates``      decoding, filters and quality metrics of generated templates
- ``lib.infill``         atom infill of templates with a chemical system
- ``lib.dedup``          within-system dedup and matching against MP
- ``lib.surrogates``     surrogate registry and batched energies/forces/stresses
- ``lib.screening``      pre-screen, relaxation, references + hull, shortlist (Ray actors)
- ``lib.surrogate_inputs`` a frame's structures checked against a surrogate's elements
- ``lib.phonons``        phonopy finite displacements with surrogate forces
- ``lib.dft_inputs``     VASP + phonopy hand-off folders
- ``lib.dft_gpaw``       GPAW run folders, presets, runs (Ray tasks), candidate / competing-phase plans
- ``lib.dft_ingest``     ingest of VASP, GPAW and phonopy results
- ``lib.dft_verdicts``   DFT verdicts on the same footing's hull, surrogate accuracy against DFT
- ``lib.lineage``, ``lib.churn``  lineage joins and surrogate churn reports
- ``lib.export``, ``lib.xrd``     structure export and simulated powder XRD
- ``lib.store``          atomic Parquet tables and the DuckDB catalog
- ``lib.report``         the discovery report: one self-contained HTML file per chemical system
"""

__version__ = "0.1.0"
