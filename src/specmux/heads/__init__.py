"""Draft heads on the target's own hidden states (Hydra/EAGLE family): the network
(:mod:`~specmux.heads.net`), files (:mod:`~specmux.heads.store`), hidden-state extraction
(:mod:`~specmux.heads.extract`), offline training (:mod:`~specmux.heads.train`) and online
evolution (:mod:`~specmux.heads.online`).  The drafter is :mod:`specmux.drafters.head`."""
