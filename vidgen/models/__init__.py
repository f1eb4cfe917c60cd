"""Model families. Each module offers a `tiny` flavor (random init from an explicit small config) and a
`pretrained` flavor (a diffusers-format directory given as a path or URI; never downloaded from a hub)."""
