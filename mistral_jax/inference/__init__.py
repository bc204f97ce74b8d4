"""Decoding and scoring: chunked prefill, the rolling-buffer decode loop, length buckets, log-likelihoods."""
