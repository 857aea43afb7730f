"""Sensors (DFT results folder, new surrogates)."""

SENSORS: list = []
