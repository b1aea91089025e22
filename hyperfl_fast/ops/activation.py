"""The activation every fused op shares; a leaf module, so models and ops both import it and nothing below."""

LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default negative slope, as in the authors' target CNNs
