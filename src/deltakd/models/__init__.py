"""Model loading, PEFT attachment (peft + our bottleneck adapters), saving and reloading."""
