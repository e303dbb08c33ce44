"""Know before launch: the memory and time a training configuration needs per device, planned without a GPU
(`ov-train plan`, the preflight); README's code map says what each module holds."""
