"""Training: the recipes (SFT, DPO and its variants, SimPO, online GRPO / RLOO), the shared
load -> train -> merge (fit), `accelerate launch` (launch, worker), the reward model of
`train-rm`, precision, and the lean CPU kernels (cpu/). The loop's stages call into it."""
