"""The lab toolkit: the KVM lab, the guest image, the benchmarks and the demo, run as
`python -m scripts.NAME` from the repository root (behind the `scripts/*` commands)."""
