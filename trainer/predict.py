"""`python -m trainer.predict` stays a command users launch under horovodrun; predict itself lives in
predictor/ (above trainer/), so this alias reaches it by module name at run time, not by import."""
import runpy

if __name__ == "__main__":
    runpy.run_module("predictor.predict", run_name="__main__", alter_sys=True)
