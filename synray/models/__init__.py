"""synray.models"""
