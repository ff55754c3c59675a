import os
import sys

# the reference implementations next to the tests
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("YOLO_OFFLINE", "1")
