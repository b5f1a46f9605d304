"""Frozen modality encoders (video/audio VAEs) and action representations."""
