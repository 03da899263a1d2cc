"""graph → MoESpec: find MoE layers in post-grad ATen graphs and rewrite them into moe_fusion ops."""
