"""GPU worker side: video decoding, Qwen-VL preprocessing, model loading and answering."""
