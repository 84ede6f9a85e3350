"""Training SpeechGPT: the SpeechInstruct data builder (`training.data`) and the three stages.

Every stage script has one shape (litgpt style): a typed config read from a YAML recipe plus
command-line overrides, `setup()` (Accelerator, seed, model, data) -> `main()` -> the shared
`training.fit.fit()` loop, and a saved model directory that the next stage loads by path.
"""
