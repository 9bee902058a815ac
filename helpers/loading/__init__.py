"""Loading: images decoded and augmented (transforms, or on the GPU: gpudecode), the per-object
dataset (objects), the synthetic dogs' pictures (synthetic), DataLoaders (dataloader), what the
loop receives (batches), and a rank's training and validation batches (loaders)."""
