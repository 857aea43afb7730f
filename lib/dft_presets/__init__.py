"""DFT presets shipped as data (``gpaw.json``) and the GPAW run script (``gpaw_script.py``).

``gpaw_script.py`` is copied into every GPAW run folder and run there by Debian's Python;
the project's venv never runs or imports it.
"""
