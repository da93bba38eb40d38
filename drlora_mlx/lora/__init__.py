"""LoRA on MoE experts: the masked and pooled layouts, attaching, the DR-LoRA handle, routing statistics."""
