"""The benchmarks' own measuring tools measure what they claim (benchmarks/sample.py's ``PeakWhile``)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def sample_bench():
    return load_benchmark("sample")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the RSS peak is reset through /proc")
def test_peak_while_counts_the_work_inside_not_before(sample_bench):
    before = np.ones(300 * 2**20 // 8)  # 300 MB touched, then freed, before the measurement starts
    del before
    with sample_bench.PeakWhile() as quiet:
        np.ones(1000).sum()
    with sample_bench.PeakWhile() as busy:
        inside = np.ones(300 * 2**20 // 8)
        del inside
    assert quiet.rss_reset and busy.rss_reset
    assert busy.rss_peak_mb - quiet.rss_peak_mb > 250  # the 300 MB inside shows; the 300 MB before did not
    assert quiet.device_peak_mb is None  # CPU reports no device bytes
