"""The scores of edits: what the probe network reads in a counterfactual, how close it comes to the labelled
demo's truth (healthy twins, atrophy masks) and how little it changes elsewhere, effect maps against the true mask,
and the mean slice of a height (a reference for both)."""
import torch

import evaluate


def effectiveness(inputs, counterfactuals, target, data, device):
    """The share of counterfactuals the probe reads as the target class, beside the share of their inputs it reads so
    (the probe is never used to make them)."""
    model, _ = evaluate.probe_for(data, device)
    read = lambda images: (evaluate.read_slices(model, images, device)[1] == target).float().mean().item()  # noqa: E731
    return {"effectiveness": read(counterfactuals), "inputs_read_as_target": read(inputs)}


def truth_scores(inputs, counterfactuals, nulls, twins, masks, region):
    """Against the truth ([-1, 1] images, mean absolute differences): inside the mask, how close the counterfactuals
    come to the healthy twins beside how far the inputs are; outside it (in the brain region), how much they change
    the inputs beside how much the null intervention does."""
    outside = ~masks & region
    mean = lambda a, b, where: (a - b).abs()[where].mean().item()  # noqa: E731
    return {"cf_to_twin_in_mask": mean(counterfactuals, twins, masks), "input_to_twin_in_mask": mean(inputs, twins, masks),
            "cf_change_outside_mask": mean(counterfactuals, inputs, outside),
            "null_change_outside_mask": mean(nulls, inputs, outside), "mask_share_of_brain": masks.float().sum().item()
            / region.float().sum().item()}


def against_truths(inputs, counterfactuals, nulls, truths, maps, region):
    """truth_scores (where counterfactuals are given) and map_scores of each effect map ({name: map}) against each
    truth ({prefix: (twins, masks)}: '' the whole disease's, 'local_' the atrophy's alone), keys prefixed."""
    figures = {}
    for prefix, (twins, masks) in truths.items():
        scores = {} if counterfactuals is None else truth_scores(inputs, counterfactuals, nulls, twins, masks, region)
        for name, effect in maps.items():
            scores.update(map_scores(name, effect, masks, region))
        figures.update({prefix + k: v for k, v in scores.items()})
    return figures


def brain_area_changes(inputs, images, level=-0.9):
    """The brain's area (pixels above level) in each set of images ({name: images}, None skipped) beside the
    inputs': the relative change of the total."""
    area = lambda x: (x > level).sum().item()  # noqa: E731
    return {f"{name}_brain_area_change": area(x) / area(inputs) - 1 for name, x in images.items() if x is not None}


def map_scores(name, maps, masks, region):
    """Pixel AUROC and AUPRC of an effect map (larger: more likely changed) against the true mask, over the brain."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision
    scores, truth = maps[region], masks[region].long()
    return {f"{name}_map_auroc": binary_auroc(scores, truth).item(),
            f"{name}_map_auprc": binary_average_precision(scores, truth).item()}


def mean_by_height(data, label, positions, width=0.05):
    """For each position, the mean training slice of class `label` (None: of all) within `width` of that height, in
    [-1, 1]: what a slice there looks like on average (a reference for effect maps, and a classical fill); with no
    heights known, the mean of them all."""
    of_class = torch.ones(len(data.train), dtype=torch.bool) if label is None else data.train_labels == label
    pool = data.train[of_class].float() / 127.5 - 1
    if positions is None or data.train_positions is None:  # no heights known: the mean of them all
        return pool.mean(0, keepdim=True).expand(len(positions) if positions is not None else 1, -1, -1, -1)
    heights = data.train_positions[of_class]
    return torch.stack([pool[(heights - p).abs() <= width].mean(0) if ((heights - p).abs() <= width).any()
                        else pool.mean(0) for p in positions.tolist()])
