"""The network: configuration and execution options (:mod:`.config`), scBERT itself
(:mod:`.network`), the FAVOR+ attention kernel (:mod:`.favor`), the first-layer cache
(:mod:`.first_layer_cache`) and the arithmetic of a forward pass (:mod:`.flops`)."""
