"""Training memory per device: analytic estimate, compiled measurement, and a planner.

    estimate.estimate(config, num_devices=None) -> Estimate   terms in bytes, no compile (derived formulas)
    calibration.table(backend) -> Table                         fitted coefficients, one table per backend
    measure.compiled(config, mesh=None) -> dict                 the compiler's figures; bound_bytes bounds device memory
    plan.plan(config, budget_bytes, num_devices=None) -> Plan   fit remat/microbatches/mesh to a budget
    plan.apply(config, budget_bytes) -> (config, record)        what wm.train calls for train.budget
    report.main / aot.main                                      the `memory` and `compile` CLI verbs

Definitions are DESIGN.md's; docs/memory.md describes the CLI and its JSON.
"""
