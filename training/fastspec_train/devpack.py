"""Pack training spectra small enough to travel to a lent GPU machine, and unpack them there.

The `device` tool sends the working tree (64 MiB at most, of which the repository takes ~43 MB) and not
../shared, so the GPU script (training/gpu/device_train.sh) carries a packed copy of the training and
validation rows only (the test rows never leave this machine): flux quantised to steps of 1/60000 (1.7e-5,
finer than the shared file's 5 decimal digits), byte-shuffled and LZMA-compressed, ~25 KB a spectrum.

    python -m fastspec_train.devpack pack --data ../shared/data/synspec_intrinsic_v2.h5 --out .devdata/train.fsp --max-mb 19
    python -m fastspec_train.devpack unpack .devdata/train.fsp /tmp/train.h5        # on the device

Rows are taken in a fixed order (by the split hash) until the budget is spent, so a smaller budget keeps a
subset of the same rows. The unpacked file has the shared HDF5 layout and the original labels, so the split
computed there (hash of the labels) puts every row in the split it had here.
"""

from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

import numpy as np

from .data import SpectraFile, split_indices, _label_hash_unit

QUANTUM = 60000.0
MAGIC = b"FSPACK1\n"


def pack(data: str | Path, out: str | Path, *, max_mb: float, val_fraction=0.1, test_fraction=0.1,
         split_seed=20261125) -> dict:
    sf = SpectraFile(data)
    split = split_indices(sf.labels, val_fraction, test_fraction, split_seed)
    rows = np.sort(np.concatenate([split["train"], split["val"]]))
    order = rows[np.argsort([_label_hash_unit(r, split_seed + 1) for r in sf.labels[rows]])]
    chunks, kept, size = [], [], len(MAGIC) + 4096
    for start in range(0, order.size, 64):
        block = np.sort(order[start:start + 64])
        q = np.round(np.clip(sf.read(block), 0.0, 65535 / QUANTUM) * QUANTUM).astype("<u2")
        raw = np.frombuffer(q.tobytes(), np.uint8).reshape(-1, 2).T.tobytes()  # byte shuffle
        c = lzma.compress(raw, preset=6)
        if size + len(c) > max_mb * 1e6:
            break
        chunks.append((block, c))
        kept.extend(block.tolist())
        size += len(c) + 16
    header = {"source": str(sf.path), "n_pixels": sf.n_pixels, "wavelength_start": sf.wavelength_start,
              "wavelength_step": sf.wavelength_step, "wavelength_medium": sf.wavelength_medium, "quantum": QUANTUM,
              "labels": sf.labels[np.array(kept, dtype=np.int64)].tolist(),
              "chunks": [[len(b), len(c)] for b, c in chunks],
              "rows_of_train_val": int(rows.size), "split": [val_fraction, test_fraction, split_seed]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        with open(tmp, "wb") as fh:
            h = json.dumps(header).encode()
            fh.write(MAGIC + len(h).to_bytes(8, "little") + h)
            for _, c in chunks:
                fh.write(c)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"spectra": len(kept), "of_train_val": int(rows.size), "bytes": out.stat().st_size}


def unpack(packed: str | Path, out: str | Path) -> Path:
    import h5py

    blob = Path(packed).read_bytes()
    if not blob.startswith(MAGIC):
        raise ValueError(f"{packed}: not a fastspec devpack file")
    hlen = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "little")
    header = json.loads(blob[len(MAGIC) + 8:len(MAGIC) + 8 + hlen])
    pos, n_pix = len(MAGIC) + 8 + hlen, header["n_pixels"]
    flux = []
    for n, clen in header["chunks"]:
        raw = np.frombuffer(lzma.decompress(blob[pos:pos + clen]), np.uint8)
        flux.append(np.frombuffer(raw.reshape(2, -1).T.tobytes(), "<u2").reshape(n, n_pix) / header["quantum"])
        pos += clen
    with h5py.File(out, "w") as f:
        f.create_dataset("flux", data=np.concatenate(flux).astype(np.float32), chunks=(1, n_pix))
        d = f.create_dataset("labels", data=np.array(header["labels"]))
        d.attrs["names"] = np.array(["teff", "logg", "mh", "vmic"], dtype=object)
        for key in ("wavelength_start", "wavelength_step", "n_pixels", "wavelength_medium"):
            f.attrs[key] = header[key]
        f.attrs["note"] = f"devpack of {header['source']} (train and validation rows only)"
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastspec_train.devpack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--data", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--max-mb", type=float, default=19.0)
    b = sub.add_parser("unpack")
    b.add_argument("packed")
    b.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        print(json.dumps(pack(args.data, args.out, max_mb=args.max_mb)))
    else:
        print(unpack(args.packed, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
