"""``fastsafe estimate-bias``: estimate a TSDI bias table and save it as safetensors.

Example::

    fastsafe estimate-bias --aligned path/to/instruct --reference path/to/sft --length 32 --prompts 512 \\
        [--prompt-file questions.txt] -o bias.safetensors

Both models must share a tokenizer / vocabulary. The table holds the mean logit difference
``aligned - reference`` for output positions 1..L over random prompts and response prefixes.
"""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("estimate-bias", aliases=["estimate_bias"], help="estimate a TSDI bias table",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--aligned", required=True, help="the safety-aligned model (local folder, .gguf, or 'default')")
    p.add_argument("--reference", required=True, help="its reference (SFT) model, same vocabulary")
    p.add_argument("--length", type=int, default=16, help="L: output positions (default 16)")
    p.add_argument("--prompts", type=int, default=256, help="N: number of random prompts (default 256)")
    p.add_argument("--prompt-file", default=None, help="text file: prompts are its lines (or its tokens)")
    p.add_argument("--prompt-pool", choices=("random", "lines", "tokens"), default=None,
                   help="random vocabulary tokens (default), lines of --prompt-file (default with a file), "
                        "or tokens drawn from it")
    p.add_argument("--prompt-length", type=int, nargs=2, default=(4, 32), metavar=("MIN", "MAX"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastsafe.models import load_model
    from fastsafe.tsdi import TSDIBias
    aligned, tok = load_model(args.aligned)
    reference, tok_ref = load_model(args.reference)
    if len(tok_ref) != len(tok) or tok_ref.get_vocab() != tok.get_vocab():
        raise ValueError(f"--reference: its tokenizer ({len(tok_ref)} tokens) differs from the aligned model's "
                         f"({len(tok)} tokens); TSDI needs one shared vocabulary")
    pool = args.prompt_pool or ("lines" if args.prompt_file else "random")
    bias = TSDIBias.estimate(aligned, reference, tok, length=args.length, num_prompts=args.prompts,
                             prompt_file=args.prompt_file, prompt_pool=pool, prompt_length=tuple(args.prompt_length),
                             batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    bias.metadata["aligned"], bias.metadata["reference"] = args.aligned, args.reference
    bias.save(args.output)
    print(f"wrote {args.output}: L = {bias.length}, V = {bias.vocab_size}, {args.prompts} prompts, "
          f"max |bias| = {bias.bias_table.abs().max().item():.4g}")
    return 0
