"""Parameter shapes of real architectures, without needing torchvision or transformers."""


def resnet50():
    """The 161 parameter tensors of torchvision's resnet50 (convs without bias, BN weight+bias, fc)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def gpt2_small():
    """The 148 parameter tensors of GPT-2 small (124M elements; the LM head is tied to wte)."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def small_tensors(n=2000, size=64):
    return [(size,)] * n


assert len(resnet50()) == 161 and len(gpt2_small()) == 148
