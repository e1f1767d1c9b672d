"""The training floor: one skeleton for every task (`run`), built from one file per job.

- `options`: the shared options (`TrainingArguments`) and recipes;
- `launch`: accelerator, logging, allocator, compilation, tracking;
- `optimization`: the step plan, fused AdamW and the schedule;
- `loop`: the optimizer-step loop; `checkpoints`: atomic checkpoints and exact resume;
- `profiling`: where a step's time goes; `publishing`: save, evaluate, results, card, upload;
- `run`: `TrainingTask` (what a task supplies) and `run_training`.
"""
