def hello(): return "w"
