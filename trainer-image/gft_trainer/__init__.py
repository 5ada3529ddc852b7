"""The trainer inside the training pod: reads the config the operator renders, fine-tunes a Gemma
with transformers' ``Trainer``, reports through callbacks, and exits with a code from
``gft_api.contract.ExitCode``."""
