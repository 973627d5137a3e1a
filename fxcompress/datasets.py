"""Small image-classification data sets for examples, benchmarks and tests, loaded offline.

    data = load_dataset("auto")   # Fashion-MNIST when its files are on disk, else scikit-learn's digits

Fashion-MNIST is read from its four IDX `.gz` files (Xiao et al. 2017); every file is checked
against its SHA-256 and its IDX header before use. scikit-learn's digits (8x8, bundled with
scikit-learn) need no files at all, so they are the fallback that always works.
"""
from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import os
import shutil
import tempfile
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, FormatError, MissingDependencyError

# Where the Debian package `dataset-fashion-mnist` installs the files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
# scikit-learn's digits file (as scikit-learn 1.9.1 ships it). load_digits reads it without importing
# scikit-learn, and its default split is the cached one at the end of this file.
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned-byte IDX files of rank 1 (labels) and 3 (images)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images N x C x H x W (float32 in [0, 1]) and int64 labels, split into train and test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    channels: int
    image_size: int
    num_classes: int


def load_dataset(name: str = "auto", root: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load "digits", "fashion-mnist", or "auto" (Fashion-MNIST when its files are present, else digits)."""
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(root, download=download)
    if name == "auto":
        present = _fashion_dir(root) is not None
        return load_fashion_mnist(root, download=download) if present or download else load_digits()
    raise ConfigError(f"load_dataset.name must be 'auto', 'digits' or 'fashion-mnist', got {name!r}")


def load_digits(test_size: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, pixel values / 16, with a fixed stratified train / test split."""
    pixels, target = _digits_file()
    if (test_size, seed) == (360, 0) and pixels is not None:
        order = np.frombuffer(zlib.decompress(base64.b85decode("".join(_DIGITS_SPLIT))), dtype="<u2")
        train, test = order[:-test_size].astype(np.int64), order[-test_size:].astype(np.int64)
    else:
        # any other split, or another copy of the file: scikit-learn itself (it imports scipy and most
        # of scikit-learn, about 1.5 s of a fresh process)
        from sklearn.model_selection import train_test_split
        if pixels is None:
            from sklearn.datasets import load_digits as sklearn_digits
            bunch = sklearn_digits()
            pixels, target = bunch.data, bunch.target
        train, test = train_test_split(np.arange(len(target)), test_size=test_size, stratify=target,
                                       random_state=seed)
    x = (pixels / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = target.astype(np.int64)
    return Dataset("digits", *(torch.from_numpy(a[i]) for a, i in ((x, train), (y, train), (x, test), (y, test))),
                   channels=1, image_size=8, num_classes=10)


@functools.cache
def _digits_file() -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """(pixels 1797 x 64 float64, labels) as scikit-learn's load_digits reads them, read here without
    importing scikit-learn; (None, None) when the file is not the one `_DIGITS_SPLIT` was made on."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the digits data set comes with scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if not path.is_file() or sha256_of(path) != DIGITS_SHA256:
        return None, None
    table = np.loadtxt(path, delimiter=",")  # as scikit-learn reads it: 65 numbers a row, the label last
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_fashion_mnist(root: str | os.PathLike | None = None, download: bool = False, *,
                       checksums: Mapping[str, str] = FASHION_MNIST_SHA256,
                       mirror: str = FASHION_MNIST_MIRROR) -> Dataset:
    """Fashion-MNIST from `root` (else the Debian package's folder); `download=True` fetches into `root`.

    `checksums` maps each of the four file names to its SHA-256 (None skips the check for a file).
    """
    folder = _fashion_dir(root)
    if folder is None and download:
        if root is None:
            raise ConfigError("load_fashion_mnist: download=True needs a root folder to download into")
        _download(Path(root), checksums, mirror)
        folder = Path(root)
    if folder is None:
        where = f"in {root}" if root is not None else f"in {DEBIAN_FASHION_MNIST}"
        raise FormatError(f"Fashion-MNIST files not found {where}: install the Debian package "
                          f"dataset-fashion-mnist, or call load_dataset('fashion-mnist', root=DIR, download=True)")
    arrays = {name: read_idx(folder / name, checksums.get(name)) for name in FASHION_MNIST_SHA256}
    train_x, train_y, test_x, test_y = (arrays[n] for n in FASHION_MNIST_SHA256)
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise FormatError(f"Fashion-MNIST {split}: {images.shape} images do not pair with {labels.shape} labels")
    side = train_x.shape[1]

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    return Dataset("fashion-mnist", images(train_x), torch.from_numpy(train_y.astype(np.int64)),
                   images(test_x), torch.from_numpy(test_y.astype(np.int64)),
                   channels=1, image_size=side, num_classes=10)


def _fashion_dir(root: str | os.PathLike | None) -> Path | None:
    """The folder holding all four Fashion-MNIST files: `root` if given, else the Debian one."""
    folder = Path(root) if root is not None else DEBIAN_FASHION_MNIST
    return folder if all((folder / name).is_file() for name in FASHION_MNIST_SHA256) else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_idx(path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
    """Read a gzip-compressed unsigned-byte IDX file, checking its SHA-256 (if given) and its header."""
    path = Path(path)
    if sha256 is not None and (actual := sha256_of(path)) != sha256:
        raise FormatError(f"{path.name}: SHA-256 {actual} does not match the expected {sha256}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise FormatError(f"{path.name}: not a readable gzip file ({exc})") from exc
    if len(raw) < 4:
        raise FormatError(f"{path.name}: truncated before the IDX magic number")
    magic = int.from_bytes(raw[:4], "big")
    rank = magic & 0xFF
    if _IDX_MAGIC.get(rank) != magic:
        raise FormatError(f"{path.name}: bad IDX magic 0x{magic:08x} (expected unsigned-byte data of rank 1 or 3)")
    header = 4 + 4 * rank
    if len(raw) < header:
        raise FormatError(f"{path.name}: truncated inside the IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise FormatError(f"{path.name}: {len(raw) - header} data bytes, but the header {dims} needs {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _download(root: Path, checksums: Mapping[str, str], mirror: str) -> None:
    """Fetch the four files into `root`; each is verified before it is renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_SHA256:
        target = root / name
        if target.is_file():
            continue
        fd, temp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(mirror.rstrip("/") + "/" + name) as src:
                shutil.copyfileobj(src, out)
            expected = checksums.get(name)
            if expected is not None and (actual := sha256_of(Path(temp))) != expected:
                raise FormatError(f"{name}: downloaded file has SHA-256 {actual}, expected {expected}")
            os.replace(temp, target)
        except OSError as exc:
            raise FormatError(f"{name}: download from {mirror} failed ({exc})") from exc
        finally:
            if os.path.exists(temp):
                os.remove(temp)


# What scikit-learn's train_test_split(range(1797), test_size=360, stratify=labels, random_state=0) returns
# on that file (scikit-learn 1.9.1; tests/test_datasets.py compares it with the installed scikit-learn):
# the training indices in their order, then the test ones, as little-endian uint16, zlib, base85.
_DIGITS_SPLIT = (
    "c-jTQ13(x66a~QlzM5^@wwrC+wym0N)NI?fZQHhaSJYAi2tsSGB7^x0SK_%82%{Rb!A^TUoTc1a&+E`c`N?T9SsVLcnd3iw4Z7k0"
    "W%Wy*8)d1Nz$#Oycjo3;qEmUMHr68k1usyZ%Sb70!`&nUM))!Rg+1O)iGJc7Ep_3&8kH*RINisoJwLvBH-089bcG-0e0)T9dmMe?"
    "Y?I}H&-342l8Q<e`zsrfjUQ8disE%O2`57s%W6gJ7+>IdLcST-{gB4gx)vF|be68Q@tlGydwP3K=V`27m$ur&cFIiDk=|OFHQ+po"
    "Ykzs{eNdb-X=#>#M*N2ta$P>jg{-@l<$Y4q`$!G{V>2|LoRt!^%FjtRpJIhQymhw<7OXkEiLKx{8dbOPbdQBeSi@6fIwz3zK1p72"
    "Z_cLAv6-TC96RADIkxvgVqS_V+J}nB3o2`a?55@CW!ldhQDMo<pKS*(vt9Z{_E;?5CFk@G3R5{N?;Vkew&H^>)-2kd>hU3pWUG-;"
    "6H_hDBn7ptx8xHx#xEeOyri7C%89JAkLFXFSYGKt&8%^0HQm+tyqR0^Gdf0XWTTzX+|<{`=xkesJ6sHxjRNLVLh68rILe>orc{-5"
    "KGL7cC%wU4yfmHRWE{~KQZG)bPwlys(da&qw_7}$V5Ov)r4Vp4AIA4!lGje*w63uxR7Vd<W{M-N!QRr^$u?}#R20(_a)`{K5Ok;5"
    "R!dV*cdjREX}%QYcfQr~SQl%cqoq1`!eaXCM|_fXwdpp42gm|l#cL&yF49$NDv5E=OUP6mOY5*mR_i+pN6YCJHIya(NHgd$Ek>!3"
    "**~JHF=dzVQca>^tgYvS)`bdD11M+ncGkv+p@Y??G?Z1IdMnN6fqdLwYB0T`7({m7URiOQBk^dVPnF)jlb7*$xKza^PDE+&O9$bn"
    "?y%wBf;U?iUZVx5FV7;<wR%~*YFG`6nLN|7_<4ED5&WV#YU*$F#YuU`&tUok`*FZ3;<g1D^EBzom82+bqi~i&XGs`6Wd&rvCbu$F"
    "Pp@IQT(F1;mKK&5;r+ez)DD_k=Giq`h<qBJd-`Bf+_e;*lg3dsK1fx$l3nA`6rNIPAD>SDtO-xV1iq+AydW0XT>fewxgYk@Lyu|c"
    "eVF8<n-rTT&~>z<rIL}aBBdtq_%aY@^d&c?CWx+aC4oM+X8cg6&<HAz6;x3R^AAmG&1tc`#(D3jyH#~5h01!puUEB@WI`QY>zBBo"
    "U-sNyOv>;#|3d@tTdUv-&G2}B6PI+Gm-7OMgBm=N{_0TOA|sKWJNg;q(P3U$qG@_fj|MVE>O(Y`Kl4QyCkS|pMw$_iyrWIEE;81~"
    "BAg__N1K2V+!!aZ)zexwIW8@wy{)jNd>L_gl2^1@SVny{r%d6D-pU42M2T!exRv*@8(NBL`wQK!P5hdFun^uz$N2>pw4-uVH|R`y"
    ";CBgh4vQ=)I@u<BPVMvt)ueJ%Uh2v+>A{;Qs<pygJs~6Ho(-ZvjjWSsqYg$UZb6-`uaB{RSVe86nRL{Rd{qYM4C<rzQ5l6%o0nr6"
    "r}Q;aofi90-p&;ynIHD?(%yyANi$sW8d#-stdj?M8?@%@+<~5P5ezX%W?9T{C@N;yS019%s4Wf04Ef>JaS0n`pvU)VUXLOgJeG<l"
    "l+@Z>j7#uu&SWu>R?b)nT#|9#fwOBVjI*s$greIi$<ARpIe(_>`jh5ySrnI!4E?CLtQ7C^U1-3&agldWJl#%jX&*J9PaZ_GIf5?2"
    "DgQ@N<hxg*Lf%t;*>=w(y{!<pl2klgzhO2-q4kzuvhpQs&J(Gm2GD9gLGLKoHu^)FY~!h+6~}QDlt^BYCkX3aiQ(Vvt)1cr9F61h"
    "I^UzGu^#>8m=xnjxFWr&jXv=_l)>-fja8+_vIV=XiayYs-WC^8QJ(8ojUf9p#LLr2&Ovvymwlsy{2i|~w>3pgO!07hpXcxvT|`Cn"
    "7iUIiiG*TS%lq>dJA#qcQd8PfB-5<4g?4IP%4qR5quk>_sV!z_QC3RmZC_8ZwKHN<S6c07d_VQ%zjmIZpc~D{FpDKeZ8F7{!xBZy"
    "DRFVnWlyLf_wdDbkG|4Ljma-$kPNpPHq@@kQ_iV>Z~%jCi4Bw`QrLFrL@vN*?VWa&HU2;f=zUM>oiu^nKzofvhiQ?o<PH)K#rd0c"
    "_ZpIo65=+U^HUTc5xEmBK^qH0C494lk#)LBs(X1GKnpd$uH%ms0lBE8WT61hPgVW5?3S1IiEsE?{-!tm5LbXxLyvE_HInS11sqj!"
    ";g~6f>IsBUL@ML2WgWHj0Hmeno`!R<NF!NoW3b=aT3lZ#$)&13(>`1X{V7PV*$!Vo75KI^#8CW2G<t={8iUJg7I};$bf1#h4kV@7"
    "zC-d`485jFB`R<7`MS!w;Es=>U-F3eViPX&T<?ZelF(~mfG^>4NUoVJoPMWUlGwxoG?W%f2J4~;&{V5Y79N6zluIwrC%Y`uQIN*)"
    "XdFW=E9M8G*4Rebd`_!(tdf`V?>dej%5zWaQ!!7sSy=x-KRAX}^UAhezVTe^$DOGKqSGCUL~c*1roBX52-4{f`rvK(u{5{#+>=U6"
    "ILwxBvXw5=aZ4ooP+Q;gA@6CEc{tzFVtR!`EW7`a*BpTo@M~KwpS_<wv_!nqOISLN=4bVpg{5Is&C=6w`KM{L2<Olh`hojWBmW@{"
    "?5&sN<=jce`w_d1rCP@lYjPj2_jHKo;_=o4d+=0KSqjwTydG$gxDG;Xq^v}8oR(cQ+243;J7n#Asa3HQHV+476ir54+avj`skPSn"
    ")Iyr;K_6`aJi${-QKYeOK8Yi6G#lg{C6`~P5jeqDu!O!?eotp7eJ&nJpwAQzxT3qbj<=?-nCgUfSZ+DZkjfuWCH*NOx`FS>MZbkk"
    "yi$LW^8&A-_brhINlWCF+BO^8v>!$FLntTR<ratW$9$U)$UeWxXSocv@Nr7Y8|WRLAT>X-48-`O8+@dOwMK|ct>wDyrURTq=HNN+"
    "w9oiUSAC1W(HnL|Q`;!niM#&Zk5CgKS!jto7(;2DB-99&fe)jJZson)%cJmD&4CeinqGS^iUIZdR@V#ZUrtStrGU30mKT;mN_v04"
    "AftSOen53uhVU3@cX<>V>PKJ1d$^H(LSxFyIc$TZL{mP;pXj9R^;)#q*I74v!ym=`5w(}M(!j?`fBd$ImY0%I1?`TQl$<j8P#=f7"
    "7_7UjtVhz86vyLg4=Tt<sg_i?!&YAg@f(cR`rO}I_;DSmdAKy*>H&Rj)il_j=qrD3@%WcN^Mh7j=i513i#O6khiOSWZD&0)f0rI|"
    "L348=tdMl1QpRFRbcu~G^qqTSH&2(&n%$;h0O!L|-_P&$vqZ;DJ<WZkl&zO}6vYPEd+elJ-e2>esOFN!e3IJG4H+V#ykEZP6D!AQ"
    "WTi#+v7A!2Ni#|!Pk4kb^RoKGO4}N$NbjVu{-!h3Ow%DNO5&AF)1JtV_}K4Rbvw>$N?MHi{s2uqh=<bx{NvHykz#p7oy9NZk59AZ"
    "K9$075=|x5ki;f>2d~2JlQgdm_I8}upGa@%>ZSF*#E?NcN-N=xRH4#-m44cLN<b5Js8pb25{e3*lb7oT)U%or1{rCl&-WF`hVc53"
    "3s`{Nl{0dLSNa#<tW$6lX?%e^u=H|R=gMbwt>}xis1Kp9GRv|co>cLbwAZ3ZEE~mFEDl}pe?9|gIXg|)OSI2s`E1Q*)wMnTNgl6_"
    "m;OQi1Kxv?+W"
)
