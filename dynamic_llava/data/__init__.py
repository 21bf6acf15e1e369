"""Datasets the project builds itself: `synth`, a procedurally generated visual benchmark of shape scenes."""
