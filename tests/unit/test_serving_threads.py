"""The gateway gives each predict call one OpenMP/BLAS thread unless the operator says otherwise."""

from __future__ import annotations

import os

from releasegate.serving import one_thread_per_call


def test_unset_thread_counts_default_to_one_and_an_operators_own_value_wins(monkeypatch):
    env = {"OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": ""}  # empty is unset, as OpenMP and OpenBLAS read it
    monkeypatch.setattr(os, "environ", env)
    assert one_thread_per_call() == {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert env == {"OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
