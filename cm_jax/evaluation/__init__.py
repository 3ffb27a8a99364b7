"""Sample-quality metrics: feature maths (`metrics`) and the embedded digits metric (`digits_metric`)."""
