"""Media in, encoder inputs out: images, video frames and audio clips prepared exactly as the
reference processors (`Gemma4ImageProcessorPil`, `Gemma4VideoProcessor`, `Gemma4AudioFeatureExtractor`)
prepare them, and the placeholder tokens each costs in the prompt."""
