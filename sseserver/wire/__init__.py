"""sseserver.wire"""
