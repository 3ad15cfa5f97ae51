"""Distributed engines of a run, one module each (single, ddp, deepspeed, fsdp); factory.py picks one."""
