"""Secure aggregation (SecAgg+): the aggregator learns only the sum of the round's updates.

The protocol of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), in the sparse-graph form of Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead" (CCS 2020): each device masks its quantised update with pairwise masks shared with k neighbours and
a self-mask, and Shamir-shares the self-mask seed and its masking key among those neighbours so the server can
remove the masks of devices that drop out, and only those.

Pure math and crypto live here (no network): ``quantize`` (fixed-point field), ``prg`` (masks from seeds),
``shamir`` (t-of-n sharing), ``keys`` (X25519 + HKDF + AEAD), ``graph`` (the neighbour graph), ``masking``,
and ``client`` (the device's state machine). The server's state machine is ``edgetrain.aggregator.secagg``.
"""
