"""SYNSPEC grid builder: make training spectra the way ../shared/data/synspec_intrinsic_v1.h5 was made.

Nothing here imports torch: the builder runs on machines without it.
"""
