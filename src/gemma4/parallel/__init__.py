"""One model over several processes (and machines): tensor parallelism for attention and MLPs,
expert parallelism for the 26B-A4B's experts, on torch.distributed (gloo on CPUs), launched by
`torchrun`. `sharding` says which part of each weight a rank holds; `ranks` holds the process
group and its collectives; `follow` lets rank 0 drive the others from a server."""
