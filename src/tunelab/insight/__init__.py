"""Training insight: the run doctor, the HTML report, sample generations, the LR finder, the pre-flight
plan, auto batch size. The first three attach to every run through the CALLBACKS registry (the run layer
below does not import this package); the LR finder and auto batch size resolve `optim.lr: auto` and
`train.auto_batch` through the RESOLVERS registry."""
