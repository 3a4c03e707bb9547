"""synray.diffusion"""
