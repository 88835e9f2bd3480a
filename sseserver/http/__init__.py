"""sseserver.http"""
