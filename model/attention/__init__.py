"""Attention analysis: exact linear-time attention scores per gene (:mod:`.scores`) and what they
say per cell type, against known markers and gene sets (:mod:`.analysis`)."""
