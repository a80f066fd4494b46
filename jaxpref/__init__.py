"""jaxpref: preference post-training (DPO, IPO, KTO, ORPO, SimPO, CPO) with LoRA in JAX."""
