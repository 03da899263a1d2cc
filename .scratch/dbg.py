import faulthandler; faulthandler.enable()
exec(open('.scratch/try_one_wave.py').read())
