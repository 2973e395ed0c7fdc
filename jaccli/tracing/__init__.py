"""Recording a forward pass: call sites, layers and whether they chain, sample independence."""
