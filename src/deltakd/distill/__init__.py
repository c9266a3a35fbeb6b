"""Knowledge distillation: loss functions, student/teacher layer maps, loss/lr curriculum."""
