"""Know before launch: the memory and time a training configuration needs per device, planned without a GPU.

    ov-train plan model=ov_qwen2_7b strategy=deepspeed_zero3 trainer.devices=8 plan.device=h100 [--json]

- workload.py: the step's batch, the data's modalities at their largest;
- trace.py: activation memory from tracing ov_train's own training step with fake tensors (MemTracker);
- state.py: weights, gradients, masters and optimizer state as each engine shards them;
- estimate.py: the two put together with the model FLOPs, for a composed config;
- report.py: the text, and the preflight training runs first (`ov-train plan` is ov_train/cli/plan.py);
- table.py: the docs' table; calibrate.py: plan against a measured CPU run; devices.py: device kinds.
"""
