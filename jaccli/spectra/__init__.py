"""Spectra of per-sample Jacobians: quantities, exact structured decompositions, matrix-free
Lanczos and Hutchinson estimates, the FFT method for circular convolutions, reports."""
