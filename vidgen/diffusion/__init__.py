"""Pure diffusion math over tensors, shared by training and generation (see DESIGN.md)."""
