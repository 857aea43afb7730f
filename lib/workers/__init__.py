"""Worker scripts that run in their own Python environments, not in the project's.

``m3gnet_tf_worker.py`` runs the paper's surrogate, the original TensorFlow M3GNet (pip
``m3gnet`` 0.2.4), under ``.venv-m3gnet-tf/bin/python`` (``make tf-m3gnet``; the pinned
packages are ``requirements-m3gnet-tf*.txt`` beside it). It imports nothing from the project;
the project talks to it through :mod:`lib.surrogates.m3gnet_tf_client`. Do not import these
modules from the project's venv.
"""
