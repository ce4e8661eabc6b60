from bench.real_scale.run import main

main()
