from privatune.simulations.benchmarks.peer.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
